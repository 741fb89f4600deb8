"""Celery's consumer with task events sent in batches on a short timer instead of one per wake-up.

Celery (5.7) buffers task events when the worker runs an event loop (the threads pool does) and
publishes them as one ``task.multi`` message per flush, but it schedules a flush for every event:
a pool thread's ``task-started`` or ``task-succeeded`` writes to the loop's wake-up pipe, the loop
thread wakes and publishes what it has, usually one or two events (measured: 1.5 PUBLISHes per
task, three events each). At hundreds of tasks per second that is a wake-up, a context switch and
a broker round trip per event.

This consumer flushes at most every ``EVENT_FLUSH_SECONDS`` instead; Celery's own buffer limit
(24 events) still flushes at once from the sending thread. Monitors (Flower) see events up to that
long after they happened, in order. Set as ``worker_consumer`` in ``worker/app.py``.
"""

from __future__ import annotations

from celery.worker.consumer import Consumer as CeleryConsumer

EVENT_FLUSH_SECONDS = 0.1


class Consumer(CeleryConsumer):
    _event_flush_due = False

    def on_send_event_buffered(self):
        # Called from pool threads and the loop thread alike: a race sends one extra flush at most.
        if self.hub and not self._event_flush_due:
            self._event_flush_due = True
            self.hub.call_soon(self._schedule_event_flush)  # the timer belongs to the loop thread

    def _schedule_event_flush(self):
        self.hub.call_later(EVENT_FLUSH_SECONDS, self._flush_due_events)

    def _flush_due_events(self):
        self._event_flush_due = False  # before the flush: an event buffered during it gets its own
        self._flush_events()

    def shutdown(self):
        self._flush_events()  # what is still buffered, before the dispatcher closes
        super().shutdown()
