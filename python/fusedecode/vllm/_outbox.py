"""The worker's end of the statistics channels: one ``StatsSender`` per calling process, and what
each gets at the end of an engine step (one message: announcements, early stops, refusals, records)."""

import logging
import os

import numpy as np

from ._channel import RECORD, StatsSender

logger = logging.getLogger("fusedecode.vllm")


class _Outbox:
    """What one channel gets at the end of a step."""

    __slots__ = ("new", "stopped", "errors", "records")

    def __init__(self):
        self.new, self.stopped, self.errors, self.records = {}, {}, {}, []

    def __bool__(self):
        return bool(self.new or self.stopped or self.errors or self.records)


class Outboxes:
    """Senders by channel, opened on first use; a channel that fails is dropped, never the engine."""

    def __init__(self, sender_factory=StatsSender):
        self._sender_factory = sender_factory
        self._senders = {}  # (path, authkey) -> StatsSender, or None after a failure
        self._boxes = {}  # StatsSender -> _Outbox
        self.on_drop = None  # called with a sender that was dropped

    def sender_for(self, options):
        """The sender of a request's channel (None if it names none, or it cannot be opened)."""
        if not options.reports:
            return None
        ident = (options.channel, options.authkey)
        if ident not in self._senders:
            try:
                sender = self._sender_factory(options.channel, options.authkey)
            except Exception as error:  # a bad or stale channel must not take the engine down
                logger.warning("fusedecode: cannot open the statistics channel %s: %s", options.channel, error)
                sender = None
            self._senders[ident] = sender
            if sender is not None:
                self._boxes[sender] = _Outbox()
        return self._senders[ident]

    def refuse(self, options, reason):
        """Tell the caller of a request that asked for statistics why it gets none."""
        sender = self.sender_for(options)
        if sender is not None:
            self._boxes[sender].errors[options.key] = reason

    def queue(self, sender, trace, records, stopped_positions):
        """Records of one trace (announcing it with its first records) and its early stop, if any."""
        box = self._boxes.get(sender)
        if box is None:
            return
        if not trace.announced:
            box.new[trace.uid] = trace.options.key
            trace.announced = True
        box.records.append(records)
        for position in stopped_positions:
            box.stopped[trace.uid] = int(position)

    def flush(self):
        """Send what this step produced, one message per channel."""
        for sender, box in list(self._boxes.items()):
            if not box:
                continue
            header = {"pid": os.getpid(), "new": box.new, "stopped": box.stopped, "errors": box.errors}
            records = np.concatenate(box.records) if box.records else np.zeros(0, RECORD)
            self._boxes[sender] = _Outbox()
            try:
                sender.send(header, records)
            except (OSError, EOFError, ValueError) as error:  # the caller went away
                logger.warning("fusedecode: statistics channel %s closed (%s); its requests are no longer "
                               "reported", sender.path, error)
                self._drop(sender)

    def _drop(self, sender):
        del self._boxes[sender]
        for ident, known in self._senders.items():
            if known is sender:
                self._senders[ident] = None
        if self.on_drop is not None:
            self.on_drop(sender)
        try:
            sender.close()
        except OSError:
            pass
