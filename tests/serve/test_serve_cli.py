"""``grouprank serve`` follows the CLI's error policy: a mistake is one line and exit 2."""

from __future__ import annotations

import pytest

from grouprank_jax.cli import main


@pytest.mark.parametrize(
    "args,names",
    [
        (("--model", "/no/such/model"), "/no/such/model does not exist"),
        (("--model", "m", "--api-key-env", "GROUPRANK_UNSET_KEY"), "GROUPRANK_UNSET_KEY"),
        (("--model", "m", "--max-batch", "0"), "--max-batch must be >= 1"),
    ],
)
def test_a_mistake_is_one_line_and_exit_2(args, names, capsys, monkeypatch):
    monkeypatch.delenv("GROUPRANK_UNSET_KEY", raising=False)
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("grouprank serve: error:")]
    assert len(errors) == 1 and names in errors[0], err
