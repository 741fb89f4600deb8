"""worker/consumer.py: task events leave in one flush per interval, not one per event."""

from worker.consumer import EVENT_FLUSH_SECONDS, Consumer


class Hub:
    def __init__(self):
        self.soon, self.later = [], []

    def call_soon(self, callback, *args):
        self.soon.append(callback)

    def call_later(self, delay, callback, *args):
        self.later.append((delay, callback))

    def run_soon(self):
        callbacks, self.soon = self.soon, []
        for callback in callbacks:
            callback()

    def run_later(self):
        entries, self.later = self.later, []
        for _, callback in entries:
            callback()


class Dispatcher:
    flushes = 0

    def flush(self):
        self.flushes += 1


def consumer():
    c = Consumer.__new__(Consumer)  # no broker: only the event hand-off is under test
    c.hub, c.event_dispatcher = Hub(), Dispatcher()
    return c


def test_many_events_one_flush_after_the_interval():
    c = consumer()
    for _ in range(30):
        c.on_send_event_buffered()
    assert len(c.hub.soon) == 1  # one wake-up of the loop, not thirty
    c.hub.run_soon()
    assert [delay for delay, _ in c.hub.later] == [EVENT_FLUSH_SECONDS]
    assert c.event_dispatcher.flushes == 0
    c.hub.run_later()
    assert c.event_dispatcher.flushes == 1


def test_an_event_after_a_flush_schedules_the_next_one():
    c = consumer()
    c.on_send_event_buffered()
    c.hub.run_soon()
    c.hub.run_later()
    c.on_send_event_buffered()
    c.hub.run_soon()
    c.hub.run_later()
    assert c.event_dispatcher.flushes == 2


def test_shutdown_flushes_what_is_buffered(monkeypatch):
    c = consumer()
    c.on_send_event_buffered()
    monkeypatch.setattr("celery.worker.consumer.Consumer.shutdown", lambda self: None)
    c.shutdown()
    assert c.event_dispatcher.flushes == 1
