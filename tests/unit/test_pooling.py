"""How an embedding model pools, read from its directory as sentence-transformers reads it (issue #36):
``read_layout`` on hand-written directories (5.x and 6.x files, and what is refused), ``pool`` on random
tensors against the formulas written out, padded on either side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zoo_agent.resident.pooling import MODES, Layout, LayoutError, pool, read_layout

V5 = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
      {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]  # fmt: skip
V6 = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"}]  # fmt: skip


def _model(tmp_path: Path, modules: Any, pooling: Any = None, **files: Any) -> Path:
    (tmp_path / "modules.json").write_text(json.dumps(modules) if not isinstance(modules, str) else modules)
    if pooling is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


def test_a_plain_transformers_directory_is_mean_pooled_and_normalised(tmp_path: Path) -> None:
    assert read_layout(tmp_path) == Layout(modes=("mean",), normalize=True, declared=False)


def test_sentence_transformers_5_files_with_flags_and_their_sentence_config(tmp_path: Path) -> None:
    flags = {"word_embedding_dimension": 8, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}
    layout = read_layout(_model(tmp_path, V5, flags, sentence_bert_config={"max_seq_length": 128, "do_lower_case": True}))
    assert (layout.modes, layout.normalize, layout.max_seq_length, layout.lower_case, layout.declared) == (("cls", "max"), True, 128, True, True)
    assert layout.describe() == "cls+max+normalize"


def test_sentence_transformers_6_files_name_the_modes_in_order_and_a_default_prompt(tmp_path: Path) -> None:
    config = {"prompts": {"query": "query: ", "document": ""}, "default_prompt_name": "query"}
    layout = read_layout(_model(tmp_path, V6, {"embedding_dimension": 8, "pooling_mode": ["lasttoken", "mean"]},
                                config_sentence_transformers=config))  # fmt: skip
    assert (layout.modes, layout.normalize, layout.prompt) == (("lasttoken", "mean"), False, "query: ")


def test_legacy_flags_that_set_nothing_mean_mean(tmp_path: Path) -> None:
    assert read_layout(_model(tmp_path, V5, {"pooling_mode_mean_tokens": False})).modes == ("mean",)


@pytest.mark.parametrize(("modules", "pooling", "files", "message"), [
    ([*V5[:2], {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}], {}, {},
     "modules.json: module 'sentence_transformers.models.Dense' is not supported; this resident embeds with Transformer, Pooling"),
    ([V5[1], V5[0]], {}, {}, "modules.json: modules Pooling, Transformer are not supported in this order"),
    ([V5[0], {**V5[1], "path": "../../etc"}], {}, {}, "modules.json: module 1's path '../../etc' must be a directory inside the model's"),
    ([V5[0], {**V5[1], "path": "/etc"}], {}, {}, "module 1's path '/etc' must be a directory inside the model's"),
    (V5, None, {}, "1_Pooling/config.json: the Pooling module's config is missing or not a JSON object"),
    (V5, {"pooling_mode": "median"}, {}, "1_Pooling/config.json: pooling_mode 'median' is not among cls, max"),
    (V5, {"pooling_mode": "mean", "include_prompt": False}, {"config_sentence_transformers": {"prompts": {"q": "q: "}, "default_prompt_name": "q"}},
     "include_prompt false leaves the default prompt out of the pooling; not supported"),
    (V5, {}, {"config_sentence_transformers": {"prompts": {}, "default_prompt_name": "q"}}, "default_prompt_name 'q' names no prompt"),
    (V5, {}, {"sentence_bert_config": {"max_seq_length": -1}}, "sentence_bert_config.json: max_seq_length must be a positive integer"),
    ({"not": "a list"}, {}, {}, "modules.json: must be a list of modules, each with a 'type'"),
    ("[" * 100_000, {}, {}, "modules.json: "),
])  # fmt: skip
def test_what_cannot_be_reproduced_is_one_line_naming_the_file(tmp_path: Path, modules: Any, pooling: Any, files: dict[str, Any], message: str) -> None:
    with pytest.raises(LayoutError) as caught:
        read_layout(_model(tmp_path, modules, pooling, **files))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def _by_hand(hidden: Any, lengths: list[int], mode: str) -> Any:
    """Each row alone, over its own tokens only: what the mode means."""
    import torch

    rows = []
    for row, n in zip(hidden, lengths, strict=True):
        tokens = row[:n]
        if mode == "cls":
            rows.append(tokens[0])
        elif mode == "max":
            rows.append(tokens.max(0).values)
        elif mode == "mean":
            rows.append(tokens.mean(0))
        elif mode == "mean_sqrt_len_tokens":
            rows.append(tokens.sum(0) / n**0.5)
        elif mode == "weightedmean":
            w = torch.arange(1, n + 1, dtype=tokens.dtype).unsqueeze(-1)
            rows.append((tokens * w).sum(0) / w.sum())
        else:
            rows.append(tokens[-1])
    return torch.stack(rows)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_pooling_a_padded_batch_gives_each_row_its_own_vector(mode: str, side: str) -> None:
    import torch

    torch.manual_seed(0)
    lengths, width, seq = [5, 2, 7], 6, 7
    own = torch.randn(3, seq, width)
    mask = torch.zeros(3, seq, dtype=torch.long)
    padded = torch.full((3, seq, width), 99.0)  # padding vectors that would show if they counted
    for i, n in enumerate(lengths):
        where = slice(0, n) if side == "right" else slice(seq - n, seq)
        mask[i, where] = 1
        padded[i, where] = own[i, :n]
    got = pool(padded, mask, (mode,), normalize=False)
    torch.testing.assert_close(got, _by_hand(own, lengths, mode))
    normalised = pool(padded, mask, (mode, "mean"), normalize=True)
    assert normalised.shape == (3, 2 * width)
    torch.testing.assert_close(normalised.norm(dim=1), torch.ones(3))


def test_half_precision_means_are_summed_in_float32() -> None:
    import torch

    hidden = torch.full((1, 4096, 2), 1000.0, dtype=torch.float16)  # the sum (4e6) overflows float16 (max 65504)
    got = pool(hidden, torch.ones(1, 4096, dtype=torch.long), ("mean",), normalize=False)
    assert got.dtype == torch.float16 and got.tolist() == [[1000.0, 1000.0]]
