"""inference.py against a save_path it cannot write: refused before any model loads when the path is
unwritable at the start (exit status 2); when the directory is replaced by a file after that check,
every prompt is still sampled, each failed write names its path and the sample's latents are kept
in a fallback directory (the same latents as a run that wrote its videos), and the run ends with
exit status 1."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.faults import jobs

PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def model_json(quickstart, tmp_path_factory) -> Path:
    """The quickstart's inference_model.json with DiT weights of its own (diffusers layout, fixed
    seed) as predictor.from_pretrained, two prompts, 2 steps, latents saved."""
    from safetensors.torch import save_file

    from tests.wan_helpers import diffusers_model

    root = tmp_path_factory.mktemp("inference_faults")
    model = json.loads((quickstart / "inference_model.json").read_text())
    pred = model["predictor"]
    dit = diffusers_model(dict(num_layers=pred["num_layers"], num_heads=pred["num_heads"],
                               hidden_size=pred["hidden_size"], ffn_dim=pred["ffn_dim"], in_dim=pred["in_dim"],
                               out_dim=pred["out_dim"], patch_size=(1, 2, 2), freq_dim=pred["freq_dim"],
                               text_dim=pred["text_dim"], rope_max_seq_len=1024))
    (root / "dit").mkdir()
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              str(root / "dit" / "diffusion_pytorch_model.safetensors"))
    pred["from_pretrained"] = str(root / "dit")
    model["inference"].update(prompt=PROMPTS, sample_steps=2, save_latents=True)
    path = root / "model.json"
    path.write_text(json.dumps(model))
    return path


def _with_save_path(model_json: Path, save_path: Path, out: Path) -> Path:
    model = json.loads(model_json.read_text())
    model["inference"]["save_path"] = str(save_path)
    out.write_text(json.dumps(model))
    return out


def test_an_unwritable_save_path_is_refused_before_any_model_loads(model_json, tmp_path):
    """A save_path under a regular file fails for every user (a read-only directory does not stop
    root: tests/unit/test_inference_config.py checks that case where it applies)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    save = blocker / "samples"
    config = _with_save_path(model_json, save, tmp_path / "model.json")
    begin = time.monotonic()
    rc, out = jobs.run([sys.executable, "inference.py", "--mm-model", str(config)], tmp_path / "log", timeout=300)
    took = time.monotonic() - begin
    assert rc == 2, out[-3000:]
    assert (f"inference.py: error: inference.save_path = {str(save)!r}: not a directory ({blocker} is a file); "
            "valid: a directory this process can create files in (made if missing)") in out, out[-3000:]
    assert "mm: 1 rank(s)" not in out  # refused before the process group, so before any model
    print(f"refused in {took:.1f} s (launch to exit)")


def test_a_write_failing_after_sampling_keeps_the_latents(model_json, tmp_path):
    """The run is stopped once its check has passed (its first log line, before the models load),
    its save_path replaced by a regular file, and continued: both prompts are sampled and both writes
    fail; each failure names the video's path and where the latents went (a fallback directory under
    the temporary directory, $TMPDIR here), and those latents equal the ones a run that could write
    saved beside its videos."""
    good = tmp_path / "good"
    rc, out = jobs.run([sys.executable, "inference.py", "--mm-model",
                        str(_with_save_path(model_json, good, tmp_path / "good.json"))], tmp_path / "good.log",
                       timeout=300)
    assert rc == 0, out[-3000:]
    expected = {p: torch.load(good / f"{p.replace(' ', '_')}_seed{42 + i}.latents.pt") for i, p in enumerate(PROMPTS)}

    save, temp = tmp_path / "samples", tmp_path / "tmp"
    temp.mkdir()
    job = jobs.Job(jobs.torchrun(1, "inference.py", "--mm-model",
                                 str(_with_save_path(model_json, save, tmp_path / "faulty.json"))),
                   tmp_path / "faulty.log", env=jobs.cpu_env(TMPDIR=str(temp))).start()
    try:
        job.wait_for(r"mm: 1 rank\(s\)", timeout=300)
        job.kill(signal.SIGSTOP)
        assert save.is_dir() and list(save.iterdir()) == [], "the check made save_path; nothing written yet"
        shutil.rmtree(save)
        save.write_text("the directory is gone")
        job.kill(signal.SIGCONT)
        faulted = time.monotonic()
        job.wait_for(r"could not write", timeout=300)
        detected = time.monotonic() - faulted
        rc = job.wait(timeout=300)
        ended = time.monotonic() - faulted
    finally:
        job.stop()
    out = job.output()
    assert rc == 1, out[-3000:]
    kept = {}
    for i, prompt in enumerate(PROMPTS):
        video = save / f"{prompt.replace(' ', '_')}_seed{42 + i}.mp4"
        found = re.search(rf"inference.py: error: could not write {re.escape(str(video))}: \[Errno 20\] Not a "
                          r"directory; the sample's latents, prompt and seed are saved in (\S+) \(torch.load\); "
                          r"going on with the other prompts", out)
        assert found, out[-3000:]
        kept[prompt] = Path(found.group(1))
        assert kept[prompt].parent.parent == temp and kept[prompt].parent.name.startswith("mm_unwritten_")
        record = torch.load(kept[prompt])
        assert (record["prompt"], record["seed"], record["video"]) == (prompt, 42 + i, str(video))
        assert torch.equal(record["latents"], expected[prompt]), prompt
    assert "inference.py: error: 2 of 2 samples of this rank could not be written" in out
    assert save.read_text() == "the directory is gone"
    print(f"first write failure reported {detected:.1f} s after the run went on, exit {ended:.1f} s after; "
          f"latents kept: {len(kept)} of {len(PROMPTS)}")


# --- ranks that wait while others work ------------------------------------------------------------

# every collective's timeout: 6 s, a few times what any collective of these tiny runs waits on a loaded
# 2-core machine; a slow phase of twice that, so a rank that waits for it inside a collective fails
TIMEOUT_MINUTES = 0.1
TIMEOUT_S = 60 * TIMEOUT_MINUTES
SLOW_S = 2 * TIMEOUT_S


def _slow_run(model_json: Path, tmp_path: Path, slow: str, prompts: list[str], *flags: str) -> tuple[int, str, float]:
    model = json.loads(model_json.read_text())
    model["inference"].update(prompt=prompts, save_path=str(tmp_path / "samples"))
    config = tmp_path / "model.json"
    config.write_text(json.dumps(model))
    began = time.monotonic()
    rc, out = jobs.run(jobs.torchrun(2, "tests/faults/slow_phase.py", "inference.py", "--mm-model", str(config),
                                     "--distributed-timeout-minutes", str(TIMEOUT_MINUTES), *flags),
                       tmp_path / "log", timeout=400, env=jobs.cpu_env(MM_SLOW_PHASE=slow))
    return rc, out, time.monotonic() - began


def test_a_decode_longer_than_the_timeout_keeps_every_rank_busy(model_json, tmp_path):
    """TP2: each VAE decode takes SLOW_S (12 s), the collectives' timeout is 6 s. The writer's TP peer
    decodes too (it holds the same latents), so it does not sit in the next prompt's first collective while
    the writer decodes: both prompts are written and the run ends normally."""
    rc, out, seconds = _slow_run(model_json, tmp_path, f"mm.models.ae.wan_vae:WanVAE.decode={SLOW_S}", PROMPTS,
                                 "--tensor-model-parallel-size", "2")
    assert rc == 0, out[-4000:]
    assert out.count("slow_phase: WanVAE.decode sleeps") == 2 * len(PROMPTS), out[-4000:]  # every rank decodes
    written = sorted(p.name for p in (tmp_path / "samples").glob("*.mp4"))
    assert written == sorted(f"{p.replace(' ', '_')}_seed{42 + i}.mp4" for i, p in enumerate(PROMPTS)), written
    print(f"figure: TP2, {SLOW_S:.0f} s decodes, {TIMEOUT_S:.0f} s timeout: both prompts written, "
          f"{seconds:.1f} s in all")


def test_a_replica_with_a_prompt_less_waits_for_the_others_past_the_timeout(model_json, tmp_path):
    """DP2 with three prompts: replica 0 samples two, replica 1 one; a prompt's decode takes SLOW_S
    (12 s), the timeout is 6 s. Replica 1 waits at the end of the run for replica 0's second prompt
    outside any collective, and the run ends normally with three videos."""
    prompts = PROMPTS + ["a green triangle"]
    rc, out, seconds = _slow_run(model_json, tmp_path, f"mm.models.ae.wan_vae:WanVAE.decode={SLOW_S}", prompts)
    assert rc == 0, out[-4000:]
    assert len(list((tmp_path / "samples").glob("*.mp4"))) == 3, out[-4000:]
    print(f"figure: DP2, 3 prompts, {SLOW_S:.0f} s decodes, {TIMEOUT_S:.0f} s timeout: 3 videos, "
          f"{seconds:.1f} s in all")
