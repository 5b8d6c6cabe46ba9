"""The speculation switch: off while proposals do not pay for their cost, back on after a pause that doubles with
each failed try; on for good while they pay."""
from pageport.core.spec_decode.switch import SpecSwitch


def _window(sw, accepted_per_step, t_step=1.0, t_propose=0.0, rows=2):
    for _ in range(sw.WINDOW):
        sw.record(rows, accepted_per_step, t_step, t_propose)


def test_switch_stays_on_while_proposals_pay():
    sw = SpecSwitch()
    for _ in range(5):
        _window(sw, accepted_per_step=2, t_propose=0.3)  # gain 2.0 against cost 1/0.7 = 1.43 (x 1.1 = 1.57)
        assert sw.on


def test_switch_pauses_when_nothing_is_accepted_and_backs_off():
    sw = SpecSwitch()
    for _ in range(sw.EARLY):  # nothing accepted at all: the try ends early
        assert sw.on
        sw.record(2, 0, 1.0, 0.0)
    assert not sw.on and sw.steps_off == sw.FIRST_PAUSE
    for _ in range(sw.FIRST_PAUSE - 1):
        sw.record(2, 0, 1.0, 0.0)
    assert not sw.on
    sw.record(2, 0, 1.0, 0.0)
    assert sw.on  # tries again
    for _ in range(sw.EARLY):
        sw.record(2, 0, 1.0, 0.0)
    assert not sw.on and sw.steps_off == 2 * sw.FIRST_PAUSE  # failed again: twice as long
    sw.wake()  # the engine ran dry: the next batch speculates, a failure pauses it as long as the last one made it
    assert sw.on and sw.pause == 4 * sw.FIRST_PAUSE
    while not sw.on:
        sw.record(2, 0, 1.0, 0.0)
    _window(sw, accepted_per_step=3)
    assert sw.on and sw.pause == sw.FIRST_PAUSE  # paid: the pause starts small again


def test_a_few_accepted_tokens_get_the_whole_window():
    """Something accepted in the first EARLY steps: judged over the whole window (gain 1 + 1/32 fails there)."""
    sw = SpecSwitch()
    sw.record(2, 1, 1.0, 0.0)
    for _ in range(sw.WINDOW - 2):
        sw.record(2, 0, 1.0, 0.0)
        assert sw.on
    sw.record(2, 0, 1.0, 0.0)
    assert not sw.on


def test_switch_weighs_the_cost_of_proposing():
    """One accepted token per two rows (gain 1.5) pays for a free proposer, not for one taking half the step."""
    cheap, dear = SpecSwitch(), SpecSwitch()
    _window(cheap, accepted_per_step=1, t_propose=0.0)
    _window(dear, accepted_per_step=1, t_propose=0.5)
    assert cheap.on and not dear.on


def test_margin_stands_for_the_asynchronous_steps_lost():
    """A free proposer accepting 1 token per 20 rows (gain 1.05) pays where steps are synchronous anyway, not
    where plain decoding would run asynchronously."""
    sync_anyway, would_be_async = SpecSwitch(1.02), SpecSwitch(1.1)
    _window(sync_anyway, accepted_per_step=1, rows=20)
    _window(would_be_async, accepted_per_step=1, rows=20)
    assert sync_anyway.on and not would_be_async.on


def test_pause_is_capped():
    sw = SpecSwitch()
    for _ in range(12):
        while sw.on:
            sw.record(2, 0, 1.0, 0.0)
        while not sw.on:
            sw.record(2, 0, 1.0, 0.0)
    assert sw.pause == sw.MAX_PAUSE
