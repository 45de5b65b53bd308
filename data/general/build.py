"""Build data/general/pairs.jsonl from CPython standard-library module docstrings (PSF licence)."""
import importlib, json, sys, warnings, pkgutil, re
warnings.simplefilter("ignore")
names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"})
mods = []
for n in names:
    mods.append(n)
    try:
        m = importlib.import_module(n)
    except Exception:
        continue
    if hasattr(m, "__path__"):
        for sub in pkgutil.iter_modules(m.__path__):
            if not sub.name.startswith("_") and "test" not in sub.name:
                mods.append(f"{n}.{sub.name}")
out, seen = [], set()
for n in mods:
    try:
        m = importlib.import_module(n)
    except BaseException:
        continue
    doc = (m.__doc__ or "").strip()
    paras = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    if len(paras) < 2:
        continue
    query = " ".join(paras[0].split())
    body = " ".join(" ".join(paras[1:]).split())[:1200]
    if len(query.split()) < 4 or len(body) < 200 or query in seen:
        continue
    seen.add(query)
    out.append({"_id": n, "query": query, "text": body})
with open("data/general/pairs.jsonl", "w") as f:
    for r in out:
        f.write(json.dumps(r) + "\n")
print(len(out), sys.version)
