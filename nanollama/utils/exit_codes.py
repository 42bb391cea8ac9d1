"""The exit codes of nanollama's commands, which launchers and schedulers act on."""

OK = 0  # finished
BAD_INPUT = 2  # a bad config, argument or data file: nothing was run
NONFINITE = 3  # the loss or gradient became NaN or infinite; the last good checkpoint is kept
PREEMPTED = 75  # SIGTERM or SIGUSR1: checkpointed, relaunch to resume (EX_TEMPFAIL)
INTERRUPTED = 130  # Ctrl-C: checkpointed

NAMES = {OK: "done", PREEMPTED: "preempted", INTERRUPTED: "interrupted"}
