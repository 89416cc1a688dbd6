"""`node --help` says, for every limit, what a client meets when it is hit; a bad --layers or limit
is one line naming it, exit 1, before the model loads."""

import pytest
from click.testing import CliRunner

from cli.node import node
from tests.conftest import assert_one_line_error, run_cli

LIMITS = {  # option: what its help must say happens when it is reached
    "--max-sessions": "full",
    "--max-positions": "too_long",
    "--max-cache-mb": "full",
    "--max-inflight-mb": "full",
    "--max-sessions-per-connection": "full",
    "--idle": "replays",
}


def test_every_limit_says_what_happens_when_it_is_hit():
    helps = {opt: p.help for p in node.params for opt in getattr(p, "opts", [])}
    for option, outcome in LIMITS.items():
        assert outcome in (helps.get(option) or ""), (option, helps.get(option))
    shown = CliRunner().invoke(node, ["--help"], terminal_width=200).output
    assert "--max-inflight-mb" in shown and "default: 256" in shown


@pytest.mark.parametrize("args, needles", [
    (["--layers", "abc"], ["--layers 'abc'", "one span of blocks, like 0-9"]),  # (not the comma form it refuses)
    (["--layers", "3"], ["--layers '3'"]),
    (["--layers", ""], ["--layers ''"]),
    (["--layers", "0-3", "--max-inflight-mb", "0"], ["--max-inflight-mb", "0"]),
    (["--layers", "0-3", "--max-inflight-mb", "lots"], ["--max-inflight-mb", "lots"]),
])
def test_bad_layers_and_limits_are_one_line(default_store, args, needles):
    proc = run_cli("node", default_store, *args, timeout=60)
    assert_one_line_error(proc, *needles)
    assert proc.returncode == 1


def test_layers_beyond_the_model_name_the_span_and_the_model(default_store):
    assert_one_line_error(run_cli("node", default_store, "--layers", "0-99", timeout=120), "0-99", "0-29")


def test_an_inflight_budget_below_the_largest_frame_is_one_line(default_store):
    proc = run_cli("node", default_store, "--layers", "0-0", "--max-inflight-mb", "4", timeout=120)
    assert_one_line_error(proc, "--max-inflight-mb 4", "--max-positions 4096")
