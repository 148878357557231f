"""SIGTERM / SIGINT during training: finish the step, checkpoint it, exit 0.

`StopSignal` is entered by the training loop (`loop.py`) around the steps;
the loop asks `should_stop(step)` after each one.
"""

import os
import signal
import socket
import threading

from absl import logging
import jax
import numpy as np


class StopSignal:
  """Turns SIGTERM / SIGINT into a stop request that the loop acts on between steps.

  The loop asks `should_stop(step)` after every step, on every process; when
  it says yes, the loop checkpoints that step and returns normally (exit
  status 0). A second signal of the same kind gets the previous handler back
  and re-delivers the signal (Ctrl-C twice stops at once, without a save).

  With several processes all of them must stop at the same step (the save is
  collective). SIGTERM, the preemption notice of TPU VMs, SLURM and
  Kubernetes, is left to JAX's preemption notifier that
  `jax.distributed.initialize` installs; `reached_preemption_sync_point`
  then agrees on a step with every process through the coordination service,
  on the host, without device work per step. SIGINT is forwarded to it as a
  SIGTERM of this process. Without the preemption service the processes
  combine their local flags with a `process_allgather` every step.

  Python runs signal handlers only between bytecodes, so a signal that comes
  during a long XLA compile would wait for it. The handlers' C side also
  writes the signal number to a wake-up socket (`signal.set_wakeup_fd`),
  and a thread reading it acknowledges the signal at once.
  """

  def __init__(self, num_processes: int = 1):
    self.received = None
    self._old = {}
    self._multi = num_processes > 1
    self._preemption = False
    self._wakeup = None  # (reader, writer, previous wake-up fd)

  def __enter__(self):
    signals = (signal.SIGTERM, signal.SIGINT)
    if self._multi:
      # jax.distributed.initialize starts the preemption service unless this
      # (public) option turned it off.
      self._preemption = bool(jax.config.jax_enable_preemption_service)
      if self._preemption:
        signals = (signal.SIGINT,)  # SIGTERM stays with JAX's preemption notifier
    for sig in signals:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    if self._old:
      self._start_acknowledging()
    return self

  def _start_acknowledging(self):
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
      previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:
      reader.close()
      writer.close()
      return
    self._wakeup = (reader, writer, previous)
    threading.Thread(target=self._acknowledge, args=(reader, set(self._old)),
                     name='mcl-signal-ack', daemon=True).start()

  @staticmethod
  def _acknowledge(reader, watched):
    """Says at once what a stop signal will do (runs until the writer closes)."""
    counts = {}
    while True:
      try:
        data = reader.recv(64)
      except OSError:
        return
      if not data:
        reader.close()
        return
      for signum in data:
        if signum not in watched:
          continue
        counts[signum] = n = counts.get(signum, 0) + 1
        name = signal.Signals(signum).name
        again = 'press Ctrl-C again' if signum == signal.SIGINT else f'send {name} again'
        if n == 1:
          logging.info('%s received: stopping after the current step and saving it '
                       '(the first step includes compiling); %s to quit without saving.',
                       name, again)
        elif n == 2:
          logging.info('%s received again: quitting without saving.', name)

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received == name:  # the second one: the previous behaviour, now
      old = self._old.pop(signum, signal.SIG_DFL)
      signal.signal(signum, old)
      if callable(old):
        old(signum, frame)
      else:
        os.kill(os.getpid(), signum)
      return
    self.received = name
    if self._multi and self._preemption and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier: every process stops

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; every process must call it."""
    if not self._multi:
      return self.received is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if self._preemption:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return bool(np.any(np.asarray(flags)))

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    if self._wakeup is not None:
      _, writer, previous = self._wakeup
      signal.set_wakeup_fd(previous)
      writer.close()  # the acknowledging thread sees the end and exits
      self._wakeup = None
