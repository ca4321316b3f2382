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
        # Sampling settings are checked at start: a bad one used to kill the engine thread at the
        # first rerank request, after which every request hung and SIGTERM could not stop it.
        (("--model", "m", "--temperature", "-1"), "--temperature must be >= 0"),
        (("--model", "m", "--top-p", "1.5"), "--top-p must be in (0, 1]"),
        (("--model", "m", "--top-k", "-3"), "--top-k must be >= 0"),
        (("--model", "m", "--mesh", "2,x"), "--mesh must be data,fsdp,tensor"),
        (("--model", "m", "--mesh", "1,1,1,1"), "--mesh must be data,fsdp,tensor"),
    ],
)
def test_a_mistake_is_one_line_and_exit_2(args, names, capsys, monkeypatch):
    monkeypatch.delenv("GROUPRANK_UNSET_KEY", raising=False)
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("grouprank serve: error:")]
    assert len(errors) == 1 and names in errors[0], err


def test_a_seed_outside_32_bits_is_an_argparse_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "m", "--seed", "-1"])
    assert exit_.value.code == 2
    assert "argument --seed: must be in [0, 2**32), got -1" in capsys.readouterr().err
