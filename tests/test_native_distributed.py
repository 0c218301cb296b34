"""Native resolution (qwen2_vl_vit + patch_merger + qwen2_vl_lm) under 2-rank FSDP on the CPU (gloo):
with one rank's batches text-only, the run equals one process with the same global batch.

Multi-process tests are marked ``distributed`` (as tests/test_distributed.py's, whose helpers they use).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SFT_PROJECT, sft_options
from test_distributed import STEPS, final_weights, launch, losses, max_difference, mixed_modality_data, wait
from test_native_resolution import NATIVE

from lavis.common import checkpoint as ckpt
from lavis.common.config import load_config
from lavis.runners import build_runner

pytestmark = pytest.mark.distributed

VISUAL = {  # how the ViT and the merger train; the LLM trains whole in both
    "trainable": (),
    "frozen": ("model.freeze.vision=frozen", "model.freeze.adapter=frozen"),
}


def test_native_fsdp_with_images_on_one_rank_only_equals_one_process(small_world, tmp_path):
    """Rank 0's batches have no image, rank 1's all have one (native resolution: each image its own number
    of patches and tokens), in the same steps, under 2-rank FSDP (batch 2 per rank) vs one process (batch 4).

    With the visual path trained, rank 0 runs it on a blank image weighted by zero (its parameters get a zero
    gradient there); with it frozen, FSDP's ``encode_images_every_step`` makes rank 0 run it all the same, so
    that both ranks gather the same shards. Either way the final weights and the losses equal one process's
    (weights within 1e-5, losses to rel 1e-5); without ``encode_images_every_step`` the frozen case fails
    (rank 0 gathers LLM shards while rank 1 gathers ViT shards)."""
    data = mixed_modality_data(small_world, tmp_path / "mixed.json", seed=42)

    def options(out: Path, visual: str, *extra: str) -> list[str]:
        return sft_options(
            small_world, out, *NATIVE, *VISUAL[visual], *STEPS, "run.seed=42", f"datasets.synthetic_sft.ann_path={data}",
            "run.dist_timeout_s=30", *extra,
        )

    procs = {visual: launch(2, options(tmp_path / f"fsdp-{visual}", visual, "run.strategy=fsdp", "run.batch_size=2"),
                            tmp_path / f"fsdp-{visual}.log") for visual in VISUAL}
    procs["broken"] = launch(2, options(tmp_path / "broken", "frozen", "run.strategy=fsdp", "run.batch_size=2",
                                        "run.strategy.encode_images_every_step=false"), tmp_path / "broken.log")
    for visual in VISUAL:
        single = tmp_path / f"single-{visual}"
        runner = build_runner(load_config(SFT_PROJECT, options(single, visual, "run.batch_size=4")))
        start = {k: v.detach().clone() for k, v in runner.trainable_state().items()}
        runner.train()
        log = tmp_path / f"fsdp-{visual}.log"
        assert wait(procs[visual], log) == 0, log.read_text()[-4000:]
        two, one = final_weights(tmp_path / f"fsdp-{visual}"), final_weights(single)
        assert one.keys() == start.keys() and {k.split(".")[0] for k in one} == (
            {"vision", "adapter", "llm"} if visual == "trainable" else {"llm"})
        assert max(float((one[k] - start[k]).abs().max()) for k in start) > 1e-3  # training moved the weights
        assert max_difference(two, one) < 1e-5, visual
        assert losses(tmp_path / f"fsdp-{visual}") == pytest.approx(losses(single), rel=1e-5)
        if visual == "trainable":  # the ViT's first and last layers moved too (images reach them on rank 1)
            for name in ("vision.model.patch_embed.proj.weight", "vision.model.blocks.1.mlp.fc2.weight", "adapter.mlp.2.weight"):
                assert float((one[name] - start[name]).abs().max()) > 1e-4, name
    assert wait(procs["broken"], tmp_path / "broken.log") != 0
    assert not ckpt.list_checkpoints(tmp_path / "broken")
