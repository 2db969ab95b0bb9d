"""README.md, DESIGN.md and docs/: every relative link resolves to a file or a heading, every
page under docs/ is reachable from README.md, and README.md stays a short front page."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs')
PAGES = ['README.md', 'DESIGN.md'] + sorted(
    os.path.join('docs', name) for name in os.listdir(DOCS) if name.endswith('.md'))
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
README_MAX_LINES = 250


def prose(path: str) -> str:
  """The page without its fenced code blocks (a link shown in code is not a link)."""
  with open(os.path.join(ROOT, path), encoding='utf-8') as f:
    return re.sub(r'^```.*?^```', '', f.read(), flags=re.S | re.M)


def anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r'[`*]', '', heading.strip().lower())
  return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(path: str) -> set[str]:
  """Every heading's anchor in a Markdown file; repeats get -1, -2, ... as on GitHub."""
  seen, out = {}, set()
  for line in prose(path).splitlines():
    match = re.match(r'#{1,6} (.+)', line)
    if match:
      name = anchor(match.group(1))
      out.add(f'{name}-{seen[name]}' if name in seen else name)
      seen[name] = seen.get(name, 0) + 1
  return out


def links(path: str) -> list[str]:
  return [target for target in LINK.findall(prose(path))
          if not re.match(r'[a-z]+:', target)]  # http:, https:, mailto:


def test_the_anchor_rule_matches_github():
  assert anchor('Formulations: DDPM, v-prediction, flow matching and EDM') == (
      'formulations-ddpm-v-prediction-flow-matching-and-edm')
  assert anchor("The studies' judge") == 'the-studies-judge'
  assert anchor('Data: TFDS, image folders, `.npz` files') == 'data-tfds-image-folders-npz-files'
  assert anchor('AMD EPYC, family 25 model 17 (Zen 4), AVX-512 BF16') == (
      'amd-epyc-family-25-model-17-zen-4-avx-512-bf16')


@pytest.mark.parametrize('page', PAGES)
def test_every_relative_link_resolves(page):
  broken = []
  for target in links(page):
    path, _, fragment = target.partition('#')
    here = os.path.dirname(os.path.join(ROOT, page))
    full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, page)
    if not os.path.exists(full):
      broken.append(f'{target}: no file {os.path.relpath(full, ROOT)}')
    elif fragment and fragment not in anchors(os.path.relpath(full, ROOT)):
      broken.append(f'{target}: no heading #{fragment} in {os.path.relpath(full, ROOT)}')
  assert not broken, f'{page}: ' + '; '.join(broken)


def test_every_docs_page_is_linked_from_the_readme():
  linked = {os.path.normpath(target.partition('#')[0]) for target in links('README.md')}
  assert not [page for page in PAGES[2:] if page not in linked]


def test_the_readme_is_a_short_front_page():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    assert len(f.read().splitlines()) <= README_MAX_LINES
