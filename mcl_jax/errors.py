"""The errors a user sees as one line: their common bases and exit statuses.

A leaf module (imports nothing from the package), so that any layer can
define its own error on one of these bases, and `mcl_jax.cli` can tell the
exit status from the type alone.
"""

import re

EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
  """A wrong command line or an impossible config: exit status 2."""
  exit_status = EXIT_USAGE


class RunError(Exception):
  """Something found at run time (missing data, a bad checkpoint): exit status 1."""
  exit_status = EXIT_FAILURE


def one_line(text) -> str:
  """`text` on one line: newlines and runs of blanks become single spaces."""
  return re.sub(r'\s+', ' ', str(text)).strip()
