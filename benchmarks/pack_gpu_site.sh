#!/usr/bin/env bash
# Pack this machine's diffusers (pure Python) into .gpu_site/diffusers.zip for a GPU machine whose image lacks it
# (the workplace's GPU image has torch and transformers but no diffusers). benchmarks/gpu_check.sh puts every
# .zip in .gpu_site/ on PYTHONPATH; carry .gpu_site along (about 6 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=$(python3 -c "import diffusers, os; print(os.path.dirname(os.path.dirname(diffusers.__file__)))")
VER=$(python3 -c "import diffusers; print(diffusers.__version__)")
mkdir -p .gpu_site
rm -f .gpu_site/diffusers.zip
(cd "$SITE" && python3 - "$PWD" "$OLDPWD/.gpu_site/diffusers.zip" "diffusers-$VER.dist-info" <<'PY'
import os, sys, zipfile
site, target, dist = sys.argv[1:]
with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
    for top in ("diffusers", dist):
        for d, dirs, files in os.walk(os.path.join(site, top)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            for f in files:
                if not f.endswith(".pyc"):
                    z.write(os.path.join(d, f), os.path.relpath(os.path.join(d, f), site))
PY
)
ls -l .gpu_site/diffusers.zip
