"""train_vit.py's command line: one meaning per flag (no prefixes, other tools' flags refused naming ours),
every default in --help, the demo's changes listed. In-process, milliseconds; one real process for the time."""


import pytest

from vitbench import cli


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--warmup-lr", "1e-5"], "--warmup-lr is not a flag of train_vit.py: timm's absolute warm-up lr; here the "
                              "warm-up starts at --warmup-lr-factor"),
    (["--epoch", "1"], "--epoch is not a flag of train_vit.py: use --epochs"),
    (["--clip", "1"], "use --clip-grad"),
    (["--amp"], "use --precision amp"),
    (["--grad-accum-steps", "4"], "accumulation is derived"),
    (["--sched", "step"], "the schedule is the recipe's"),
    (["--mixed_precision", "bf16"], "accelerate launch's; here --precision"),
    (["--max", "3"], "unknown flag --max"),  # a prefix of --max-steps once, now nothing
    (["--warmup-lr-fac", "0.1"], "unknown flag --warmup-lr-fac (did you mean --warmup-lr-factor?)"),
    (["--epochz=3"], "unknown flag --epochz (did you mean --epochs?)"),
])
def test_a_flag_means_one_thing_or_is_refused_naming_ours(argv, message, capsys):
    assert message in refused(argv, capsys)


def test_every_flag_shows_its_default_and_the_demo_says_what_it_changes():
    parser = cli.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in formatter._get_help_string(action), action.option_strings
    text = parser.format_help()
    assert "(default: ra)" in text and "(default: 79.98)" in text and "(default: 0.033)" in text
    for key, value in cli.DEMO.items():
        assert f"--{key.replace('_', '-')} {'none' if value is None else value}" in parser.epilog, key


def test_the_early_stop_can_be_turned_off():
    assert cli.parse_args([]).target_acc1 == 79.98
    assert cli.parse_args(["--target-acc1", "none"]).target_acc1 is None




def test_a_finished_main_leaves_its_objects_out_of_the_exit_collection():
    """cli.run freezes the garbage collector once main returns: teardown then skips the objects torch, DeepSpeed
    and the model made (bench: over a second of every rank's exit); an error exit leaves by os._exit instead."""
    import gc

    made = []
    try:
        cli.run(lambda argv: made.append([object() for _ in range(1000)]))
        assert made and gc.get_freeze_count() >= 1000
    finally:
        gc.unfreeze()
