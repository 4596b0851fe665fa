-- N cycles spread over the hosts: a host's oldest WAITING box RUNNING, DYING, DEAD, and a WAITING replacement
DO $$
DECLARE b record; i int; hosts text[];
BEGIN
  SELECT array_agg(id ORDER BY id) INTO hosts FROM hosts;
  FOR i IN 1..N LOOP
    SELECT m.id, m.host_id INTO b FROM mandelboxes m
      WHERE m.host_id = hosts[1 + i % array_length(hosts, 1)] AND m.state = 'WAITING' ORDER BY m.created_at LIMIT 1;
    UPDATE mandelboxes SET state = 'RUNNING', session_id = gen_random_uuid() WHERE id = b.id;
    UPDATE mandelboxes SET state = 'DYING' WHERE id = b.id;
    UPDATE mandelboxes SET state = 'DEAD' WHERE id = b.id;
    INSERT INTO mandelboxes (id, host_id, region, app, state, token_hash, created_at, updated_at)
      VALUES (gen_random_uuid(), b.host_id, 'us-east-1', 'chrome', 'WAITING', 'x', clock_timestamp(), clock_timestamp());
    IF i % 50 = 0 THEN COMMIT; END IF;
  END LOOP;
END $$;
