"""Users' own prompt files: read (.jsonl or plain text) and write (.jsonl, atomically).

Formats:
  .jsonl / .ndjson  one JSON object per line: {"prompt": "...", "category": "portrait", ...};
                    "category" defaults to 'general', other keys are kept in `extra`.
                    Blank lines are skipped.
  anything else     plain text: one prompt per line, category 'general'; blank lines and lines
                    starting with '#' are skipped.

Edit prompt files (rl.task='edit') are .jsonl whose records also carry "edit": the tiny world's
edit triple as `edits.to_dict` writes it (kind, source and target specs, instruction); "prompt" is
the instruction the policy reads and "category" the source scene's. `read_edit_prompt_file`
checks both; the source image is rendered from the spec.

Every error is a PromptFileError (a ValueError) whose message starts with 'PATH, line N:' so the
user can jump straight to the bad line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from qwen_image_rl import paths
from qwen_image_rl.data import edits, world

JSONL_SUFFIXES = ('.jsonl', '.ndjson')
DEFAULT_CATEGORY = 'general'
_RESERVED_KEYS = ('prompt', 'category')


class PromptFileError(ValueError):
  """A prompt file that cannot be used; `path` and `line` (1-based, or None) say where."""

  def __init__(self, path, line: int | None, message: str):
    self.path = os.fspath(path)
    self.line = line
    where = self.path if line is None else f'{self.path}, line {line}'
    super().__init__(f'{where}: {message}')


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  prompt: str
  category: str = DEFAULT_CATEGORY
  line: int = 0  # 1-based line in the file it came from; 0 when not read from a file
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def is_jsonl(path) -> bool:
  return os.fspath(path).lower().endswith(JSONL_SUFFIXES)


def _check_category(category, path, line: int | None) -> str:
  if not isinstance(category, str):
    raise PromptFileError(path, line, f'"category" must be a string, got {category!r}')
  if category not in world.CATEGORIES:
    raise PromptFileError(
      path, line, f'unknown category {category!r}; known categories: {", ".join(world.CATEGORIES)}'
    )
  return category


def _check_prompt(prompt, path, line: int | None) -> str:
  if not isinstance(prompt, str):
    raise PromptFileError(path, line, f'"prompt" must be a string, got {prompt!r}')
  if not prompt.strip():
    raise PromptFileError(path, line, '"prompt" is empty')
  return prompt.strip()


def _lines(path) -> list[str]:
  """Decoded lines; a bad byte sequence is reported with its line number."""
  if paths.is_url(path):
    if not paths.exists(path):
      raise PromptFileError(path, None, 'no such prompt file')
    if paths.isdir(path):
      raise PromptFileError(path, None, 'is a directory, not a prompt file')
  try:
    with paths.open_file(path, 'rb') as f:
      raw = f.read()
  except FileNotFoundError:
    raise PromptFileError(path, None, 'no such prompt file') from None
  except IsADirectoryError:
    raise PromptFileError(path, None, 'is a directory, not a prompt file') from None
  if raw.startswith(b'\xef\xbb\xbf'):  # a UTF-8 byte order mark, as some editors write
    raw = raw[3:]
  lines = []
  for number, chunk in enumerate(raw.splitlines(), start=1):
    try:
      lines.append(chunk.decode('utf-8'))
    except UnicodeDecodeError as e:
      raise PromptFileError(path, number, f'not valid UTF-8 ({e.reason} at byte {e.start})') from e
  return lines


def _parse_jsonl_line(text: str, path, number: int) -> PromptRecord:
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise PromptFileError(path, number, f'malformed JSON: {e.msg} (column {e.colno})') from e
  if not isinstance(obj, dict):
    raise PromptFileError(
      path,
      number,
      f'expected a JSON object like {{"prompt": "..."}}, got a JSON {type(obj).__name__}',
    )
  if 'prompt' not in obj:
    raise PromptFileError(path, number, f'missing "prompt" key (keys: {sorted(obj)})')
  prompt = _check_prompt(obj['prompt'], path, number)
  category = _check_category(obj.get('category', DEFAULT_CATEGORY), path, number)
  extra = {k: v for k, v in obj.items() if k not in _RESERVED_KEYS}
  return PromptRecord(prompt=prompt, category=category, line=number, extra=extra)


def read_prompt_file(path) -> list[PromptRecord]:
  """Reads a .jsonl or plain-text prompt file; raises PromptFileError naming the line."""
  lines = _lines(path)
  jsonl = is_jsonl(path)
  records = []
  for number, text in enumerate(lines, start=1):
    stripped = text.strip()
    if not stripped:
      continue
    if jsonl:
      records.append(_parse_jsonl_line(stripped, path, number))
    elif not stripped.startswith('#'):
      records.append(PromptRecord(prompt=stripped, category=DEFAULT_CATEGORY, line=number))
  if not records:
    what = 'blank lines' if jsonl else 'blank or comment lines'
    raise PromptFileError(
      path, None, f'no prompts: the file is empty or has only {what} ({len(lines)} lines)'
    )
  return records


def read_edit_prompt_file(path) -> list[tuple[PromptRecord, edits.Edit]]:
  """(record, edit) per line of an edit prompt file; raises PromptFileError naming the line."""
  if not is_jsonl(path):
    raise PromptFileError(
      path, None, f'an edit prompt file is JSON lines with an "edit" per record ({JSONL_SUFFIXES})'
    )
  out = []
  for record in read_prompt_file(path):
    if 'edit' not in record.extra:
      raise PromptFileError(
        path, record.line, 'missing "edit" (the edit triple, as data.edits.to_dict writes it)'
      )
    try:
      edit = edits.from_dict(record.extra['edit'])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise PromptFileError(
        path, record.line, f'malformed "edit": {type(e).__name__}: {e}'
      ) from None
    if record.category != edit.category:
      raise PromptFileError(
        path,
        record.line,
        f'"category" {record.category!r} is not the edit source\'s {edit.category!r}',
      )
    out.append((record, edit))
  return out


def _as_record(record) -> PromptRecord:
  if isinstance(record, PromptRecord):
    return record
  if isinstance(record, Mapping):
    record = dict(record)
    extra = {k: v for k, v in record.items() if k not in _RESERVED_KEYS}
    return PromptRecord(
      prompt=record.get('prompt'), category=record.get('category', DEFAULT_CATEGORY), extra=extra
    )
  raise TypeError(f'expected PromptRecord or a mapping with "prompt", got {type(record).__name__}')


def _record_line(record: PromptRecord, path, index: int) -> str:
  # `index` is the 1-based line the record will occupy in the written file.
  prompt = _check_prompt(record.prompt, path, index)
  category = _check_category(record.category, path, index)
  clash = [k for k in record.extra if k in _RESERVED_KEYS]
  if clash:
    raise PromptFileError(path, index, f'extra keys {clash} clash with the record fields')
  obj = {'prompt': prompt, 'category': category, **record.extra}
  try:
    return json.dumps(obj, ensure_ascii=False, sort_keys=False)
  except (TypeError, ValueError) as e:
    raise PromptFileError(path, index, f'record is not JSON-serialisable: {e}') from e


def write_prompt_file(path, records: Iterable) -> int:
  """Writes records (PromptRecord or mappings) as .jsonl, atomically; returns how many.

  Everything is validated before the file is touched; the data goes to a temporary file in the
  same directory, is fsynced, then renamed over `path`, so readers never see a partial file.
  """
  if not is_jsonl(path):
    raise PromptFileError(
      path, None, f'write_prompt_file writes JSON lines; name the file with one of {JSONL_SUFFIXES}'
    )
  lines = [_record_line(_as_record(r), path, i) for i, r in enumerate(records, start=1)]
  if not lines:
    raise PromptFileError(path, None, 'no records to write (read_prompt_file rejects empty files)')
  if paths.is_url(path):  # one object upload: readers see all of it or nothing
    paths.write_text_atomic(path, '\n'.join(lines) + '\n')
    return len(lines)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(
    prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory
  )
  try:
    with os.fdopen(fd, 'w', encoding='utf-8', newline='\n') as f:
      f.write('\n'.join(lines) + '\n')
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a prompt file is ordinary data
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return len(lines)
