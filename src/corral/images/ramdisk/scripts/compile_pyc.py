"""Run by the ramdisk's own Python at build time (not imported): compiles every .py under
the given directories into unchecked-hash .pyc files, with the tree's own interpreter (so
magic number and cache tag match) and only builtin modules.

Usage: compile_pyc.py ROOT DIR...; prints the number of files compiled."""

import importlib._bootstrap_external as bootstrap
import importlib.util
import os
import sys

root, dirs = sys.argv[1], sys.argv[2:]
count = 0
for top in dirs:
    for dirpath, _, files in os.walk(top):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                source = f.read()
            shown = "/" + os.path.relpath(path, root)
            code = compile(source, shown, "exec", dont_inherit=True)
            data = bootstrap._code_to_hash_pyc(  # type: ignore[attr-defined]
                code, importlib.util.source_hash(source), False
            )
            cache = importlib.util.cache_from_source(path)
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(cache, "wb") as f:
                f.write(data)
            count += 1
print(count)
