"""``capture_routing``: counts routing inside the block, leaves the caller's state as it was."""

from __future__ import annotations

import torch

from llava_mole import MoLEConfig, apply_mole
from llava_mole.adapters.observe import capture_routing, enable_routing_stats
from llava_mole.adapters.state import get_state
from llava_mole.eval.routing import routing_picture
from tests.models import family_zoo as zoo


def test_capture_routing_counts_and_restores() -> None:
    spec = zoo.BY_KEY["llama"]
    model = apply_mole(zoo.build(spec), MoLEConfig(rank=2, alpha=4, num_experts=2, mode="mole"))
    batch = zoo.batch(spec)
    batch.pop("labels")
    state = get_state(model)
    enable_routing_stats(model)  # the caller's own statistics, with a count already
    with torch.no_grad():
        model(**batch)
    before = {b: t.clone() for b, t in state.stats.items()}
    tags = torch.tensor([1, 0])
    state.domain_ids, state.num_domains = tags, 2

    with capture_routing(model) as capture:
        assert capture.stats == {} and not state.collect_stats
        with torch.no_grad():
            model(**batch)  # outside `collecting`: not counted
        assert capture.stats == {}
        with capture.collecting(torch.tensor([0, 0]), 1), torch.no_grad():
            model(**batch)
        counts = capture.stats
    tokens = int(batch["attention_mask"].sum())
    assert counts and all(float(c.sum()) == tokens for c in counts.values())
    picture = routing_picture(counts, ["d"])
    assert picture["experts"] == 2 and picture["blocks"][0]["text_tokens"] == tokens

    assert state.collect_stats and state.domain_ids is tags and state.num_domains == 2
    assert state.stats.keys() == before.keys()
    assert all(torch.equal(state.stats[b], before[b]) for b in before)
