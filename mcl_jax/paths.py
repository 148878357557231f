"""File I/O on workdir paths that is not Orbax's.

`write_atomic` replaces a small file (config.json, a cut-back metrics.jsonl)
so that a kill leaves either the old or the new content, never half of it.
"""

import os
import uuid


def write_atomic(path: str, text: str):
  """Writes `text` to `path` through a temporary file and a rename."""
  tmp = f'{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
  try:
    with open(tmp, 'x') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
