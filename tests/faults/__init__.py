"""The fault suite of issue 16: hostile clients, servers, files, signals and operators, as real processes.

Which test covers which class (and defect of issue 16 §1):

- hostile clients: ``test_grammar_hostile_lines`` (huge Seqs, odd bytes),
  ``test_grammar_differential`` (the grammar against server-linux),
  ``test_http_hostile`` (slowloris, malformed HTTP, -http-allow),
  ``test_idle_timeout`` (idle sessions end between T and 1.25 T),
  ``test_fd_exhaustion`` (EMFILE on accept: one line with a count, accepting resumes);
- hostile files: ``test_recovery_file`` (impossible values, symlinks, a directory,
  two instances on one file), ``test_fuzz_targets`` (atheris on the decoders);
- hostile signals: ``test_signals`` (SIGUSR2 from the first import on, stdout closed,
  SIGUSR1/SIGHUP to a single proxy and -workers 2);
- careless operators: ``test_flags`` (bad flags and ranges, forwarding to itself).

Internal session errors (``errors_internal``, /health degraded while they rise) are
tested in ``tests/integration/test_internal_errors.py``, which plants a raising
``Stats.record`` in a real session.
Orphaned workers' traffic after kill -9 of the master, adopted by the next master
from the slot-table file, is tested in ``tests/e2e/test_orphans.py``.
Hostile servers are covered by the e2e and integration suites (``tests/integration/test_chaos.py``).
"""
