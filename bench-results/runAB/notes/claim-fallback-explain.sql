SET enable_bitmapscan = off;
PREPARE best(text[], text, text[]) AS
SELECT b.id FROM (
  SELECT u.name, min(u.ord) AS ord FROM unnest($1::text[]) WITH ORDINALITY AS u(name, ord)
  WHERE EXISTS (SELECT 1 FROM mandelboxes w WHERE w.state = 'WAITING' AND w.region = u.name AND w.app = $2)
  GROUP BY u.name ORDER BY 2) reg
CROSS JOIN LATERAL (
  (SELECT h.id FROM (SELECT k.host_id FROM host_ranks k WHERE k.region = reg.name ORDER BY k.free_slots, k.host_id LIMIT 64) k
   CROSS JOIN LATERAL (SELECT h.id FROM hosts h LEFT JOIN regions r ON r.name = h.region
      WHERE h.id = k.host_id AND h.region = reg.name AND h.state = 'ACTIVE'
        AND (COALESCE(r.image, '') = '' OR h.image = r.image) AND h.id <> ALL($3) OFFSET 0) h)
  UNION ALL
  (SELECT h.id FROM hosts h LEFT JOIN regions r ON r.name = h.region
   LEFT JOIN (SELECT k.host_id FROM host_ranks k WHERE k.region = reg.name ORDER BY k.free_slots, k.host_id LIMIT 64) seen ON seen.host_id = h.id
   CROSS JOIN LATERAL (SELECT count(*) AS busy FROM mandelboxes a WHERE a.host_id = h.id AND a.state IN ('ALLOCATED', 'RUNNING')) load
   WHERE seen.host_id IS NULL AND h.state = 'ACTIVE' AND h.region = reg.name
     AND h.id IN (SELECT w.host_id FROM mandelboxes w WHERE w.state = 'WAITING' AND w.app = $2 AND w.region = reg.name)
     AND (COALESCE(r.image, '') = '' OR h.image = r.image) AND h.id <> ALL($3)
   ORDER BY h.capacity - load.busy, h.id)
) b;
\timing on
EXPLAIN (ANALYZE, BUFFERS) EXECUTE best('{us-east-1}', 'chrome', '{}');
EXECUTE best('{us-east-1}', 'chrome', '{}');
