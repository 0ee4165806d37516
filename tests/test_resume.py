"Issue 21 item 4: a damaged latest checkpoint is set aside, training resumes from the one before (a real tiny run)."
import json
from pathlib import Path
import pytest

torch = pytest.importorskip("torch")
from anita import sft as S
from test_train import FAST, _adapter, _data, _tok

def _losses(out): return {r["step"]: r["loss"] for r in json.loads((Path(out)/"train_log.json").read_text())}

def test_damaged_latest_checkpoint(tiny_llama3_dir, tmp_path):
    "Truncate the newest checkpoint's adapter: the rerun names it, moves it aside, resumes from the one before."
    ds = _data("sft", _tok(tiny_llama3_dir))
    ds = ds.select(range(min(12, len(ds))))
    opts = {**FAST, **dict(max_length=256, max_steps=4, save_steps=2, save_total_limit=3, packing=True, generate=False,
                           merge=False)}
    out, ck = tmp_path/"s", tmp_path/"s"/"checkpoints"
    r1 = S.train_sft(tiny_llama3_dir, ds, out, **opts)["report"]
    first, a1 = _losses(out), _adapter(out)
    assert r1["resumed_from"] is None and "damaged_checkpoints" not in r1 and sorted(first) == [1, 2, 3, 4]
    assert S.latest_checkpoint(ck).endswith("checkpoint-4")
    f = ck/"checkpoint-4"/"adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:f.stat().st_size//2])           # as a disk that filled up leaves it
    r2 = S.train_sft(tiny_llama3_dir, ds, out, **opts)["report"]
    assert r2["resumed_from"].endswith("checkpoint-2") and r2["optimizer_steps"] == 4
    assert r2["damaged_checkpoints"] == "checkpoint-4"
    d = r2["damaged_checkpoints_detail"][0]
    assert "adapter_model.safetensors" in d["problem"] and Path(d["moved_to"]) == ck/"damaged"/"checkpoint-4"
    assert (ck/"damaged"/"checkpoint-4"/"adapter_model.safetensors").exists()
    second = _losses(out)                                # steps 1-2 from checkpoint-2's state, 3-4 trained again
    assert sorted(second) == [1, 2, 3, 4] and second == pytest.approx(first, rel=1e-4)
    a2 = _adapter(out)
    assert a1.keys() == a2.keys() and all(torch.allclose(a1[k], a2[k], atol=1e-5) for k in a1)
    assert S.latest_checkpoint(ck).endswith("checkpoint-4")          # the retrained step 4 saved again
