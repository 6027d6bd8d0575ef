"""The exception types users see: bad input, reported as a single line, and a preempted
multi-process job."""


class GptjaxError(ValueError):
    """A problem with the user's input or files; the CLI prints it and exits with 2."""


class CheckpointDamaged(GptjaxError):
    """A checkpoint whose files cannot be read or whose arrays do not match their
    checksums."""


class RunFailed(GptjaxError):
    """A run that started and then had to stop: a non-finite loss, a failed write. The CLI
    prints it in one line and exits with 1."""


class Preempted(KeyboardInterrupt):
    """A run stopped at a step boundary after a SIGTERM or SIGINT (in a multi-process job,
    at the step every process agreed on, parallel.preemption); like Ctrl-C, the state there
    is saved."""

    def __init__(self, step: int, reason: str = "stopped"):
        super().__init__(step)
        self.step = step
        self.reason = reason
