import sys,collections
groups={}
for arg in sys.argv[1:]:
    name,tids=arg.split("=")
    for t in tids.split(","): groups[t]=name
tot=collections.Counter(); sym=collections.defaultdict(collections.Counter); inc=collections.defaultdict(collections.Counter)
allc=0
for block in sys.stdin.read().split("\n\n"):
    ls=[l for l in block.split("\n") if l.strip()]
    if not ls: continue
    allc+=1
    tid=ls[0].split()[0]
    g=groups.get(tid, "postgres" if len(ls)>1 else "other")
    frames=[" ".join(l.split()[1:]) for l in ls[1:]]
    top=frames[0] if frames else "?"
    tot[g]+=1; sym[g][top]+=1
    for f in set(frames): inc[g][f]+=1
for g in sorted(tot, key=lambda g:-tot[g]):
    n=tot[g]; print("%s %.1f%% of machine (%d)"%(g,100*n/allc,n))
    if g in ("other",): continue
    for s,k in sym[g].most_common(18): print("   self %5.2f%% %s"%(100*k/n, s[:100]))
    for s,k in inc[g].most_common(40)[:40]:
        print("   incl %5.2f%% %s"%(100*k/n, s[:100]))
