"""`train.profile_steps = (start, stop)`: steps [start, stop) traced with jax.profiler into workdir/profile,
for TensorBoard's profile plugin or XProf, and as a Perfetto trace (perfetto_trace.json.gz, for
ui.perfetto.dev or experiments/profile_train_step.py --trace) ((0, 0): no trace)."""

from __future__ import annotations

import jax

from ramjax.errors import ConfigError


class ProfileWindow:
    def __init__(self, window, directory: str):
        window = tuple(window)
        if len(window) != 2 or not all(isinstance(w, int) and w >= 0 for w in window) or window[1] < window[0]:
            raise ConfigError(f"train.profile_steps: (start, stop) with 0 <= start <= stop, got {window!r}")
        self.start, self.stop_at = window
        self.directory, self.active = directory, False

    def before(self, step: int) -> None:
        if self.start < self.stop_at and step == self.start:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True

    def after(self, done: int, outputs) -> None:
        if self.active and done >= self.stop_at:
            jax.block_until_ready(outputs)  # the traced steps' device work inside the window
            self.stop()
            if jax.process_index() == 0:
                print(f"ramjax train: steps {self.start}..{self.stop_at - 1} traced into {self.directory}")

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
