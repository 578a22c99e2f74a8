"""What each supported megatron-core release needs (lss_plugin.megatron.compat), the Megatron-LM
patches it names, and the Megatron-LM flags LSS refuses. No processes: the integration tests
(test_megatron.py, test_main_job.py) run under 0.16.1 (`make test`) and 0.19.2
(`make test-megatron-latest`)."""
from __future__ import annotations

import os
import re
import warnings

import pytest

from lss_plugin.megatron.compat import (
    MEGATRON_LM_PATCHES,
    MegatronCoreTraits,
    check_version,
    parse_version,
)
from tests.test_megatron import _megatron_like_parser

PATCHES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "patches")


@pytest.mark.parametrize("text,version", [("0.16.1", (0, 16, 1)), ("0.19.2", (0, 19, 2)),
                                          ("0.17.0rc0", (0, 17, 0)), ("0.20", (0, 20, 0))])
def test_versions_parse(text, version):
    assert parse_version(text) == version


def test_releases_get_the_cpu_stream_shim_and_patch_they_need():
    old, mid, new = (MegatronCoreTraits.for_version(v) for v in ((0, 16, 1), (0, 18, 2), (0, 19, 2)))
    assert (old.grad_sync_needs_cuda_stream, mid.grad_sync_needs_cuda_stream,
            new.grad_sync_needs_cuda_stream) == (False, False, True)
    assert (old.megatron_lm_patch, mid.megatron_lm_patch, new.megatron_lm_patch) == (
        "megatron_lm_core_v0.16.1.patch", None, "megatron_lm_core_v0.19.0.patch")


def test_too_old_a_release_is_refused_by_version_and_a_newer_one_warns():
    with pytest.raises(RuntimeError, match=r"megatron-core 0\.15\.3 is older .* 0\.16\.1 .* >=0\.17,<0\.20"):
        check_version((0, 15, 3))
    with pytest.warns(UserWarning, match=r"megatron-core 0\.20\.0 is newer than lss_plugin was tested"):
        check_version((0, 20, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for version in ((0, 16, 1), (0, 17, 1), (0, 18, 2), (0, 19, 2)):
            check_version(version)


@pytest.mark.parametrize("release,name", sorted(MEGATRON_LM_PATCHES.items()))
def test_each_named_patch_exists_and_states_its_tag(release, name):
    with open(os.path.join(PATCHES, name)) as f:
        text = f.read()
    tag = re.search(r"Applies to: Megatron-LM tag (\S+)", text).group(1)
    assert name == f"megatron_lm_{tag}.patch" and tag.startswith("core_v%d.%d." % release)
    assert "diff --git a/pretrain_gpt.py b/pretrain_gpt.py" in text
    with open(os.path.join(PATCHES, "README.md")) as f:
        assert name in f.read()


def test_megatron_lm_flags_that_would_bypass_lss_are_refused_by_name(monkeypatch):
    from lss_plugin.megatron.megatron_lm import lss_extra_args_provider

    monkeypatch.setenv("WORLD_SIZE", "2")
    parser = _megatron_like_parser()
    parser.add_argument("--spec", nargs="*", default=None)
    parser.add_argument("--attention-backend", default="auto")
    for flag in ("--sft", "--dataloader-inter-document-masking", "--hybrid-context-parallel"):
        parser.add_argument(flag, action="store_true")
    parser = lss_extra_args_provider(parser)
    lss = ["--seq-length", "64", "--attention-dropout", "0", "--lss-sequence-parallel"]
    for extra, message in [
        (["--spec", "local", "my_spec"], "cannot honour --spec local my_spec (the LSS layer spec replaces the spec module)"),
        (["--attention-backend", "local"], "--attention-backend local"),
        (["--sft"], "--sft (packed documents)"),
        (["--dataloader-inter-document-masking", "--hybrid-context-parallel"],
         "--dataloader-inter-document-masking (packed documents), --hybrid-context-parallel"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parser.parse_args(lss + extra)
    assert parser.parse_args(lss).context_parallel_size == 2
    assert parser.parse_args(["--seq-length", "64", "--sft"]).sft  # without LSS: untouched
