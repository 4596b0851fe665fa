import re,sys
# allocations per second in each 10 s of a loadgen progress log ("[allocate x64] 12.4s done N ...")
for name in sys.argv[1:]:
    pts=[(float(t),int(n)) for t,n in re.findall(r'\[allocate x64\]\s+([\d.]+)s\s+done (\d+)', open(name,errors='replace').read().replace('\r','\n'))]
    out=[]; last=(0.0,0); edge=10.0
    for t,n in pts:
        if t>=edge:
            out.append(f"{(n-last[1])/(t-last[0]):.0f}"); last=(t,n); edge+=10
    print(f"{name}: " + " ".join(out))
