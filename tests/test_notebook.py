"""experiments/restore_and_sample.ipynb, executed headlessly on a tiny digits checkpoint."""

import os
import sys

import nbformat
from nbclient import NotebookClient


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'experiments', 'restore_and_sample.ipynb')


def inject_parameters(nb, **params) -> None:
  """Replaces the source of the cell tagged `parameters` with the given assignments."""
  cells = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(cells) == 1, 'the notebook needs exactly one cell tagged "parameters"'
  cells[0].source = '\n'.join(f'{k} = {v!r}' for k, v in params.items())


def test_notebook_restores_and_shows_samples(tiny_digits_run):
  _, workdir = tiny_digits_run
  # The run's config.json, not the config file, must describe the tiny model.
  nb = nbformat.read(NOTEBOOK, as_version=4)
  inject_parameters(nb, WORKDIR=workdir, CONFIG='configs/no_such_file.py', NUM_STEPS=3,
                    NUM_SAMPLES=4, SEED=1)
  nb.cells.append(nbformat.v4.new_code_cell(
      "import sys\nprint('executable', sys.executable)\n"
      "print('tensorflow imported:', 'tensorflow' in sys.modules)"))
  client = NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}})
  client.execute()

  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  errors = [o for o in outputs if o.output_type == 'error']
  assert not errors, errors
  images = [o for o in outputs if o.output_type == 'display_data' and 'image/png' in o.data]
  assert len(images) == 2 and all(len(i.data['image/png']) > 100 for i in images)
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'restored the EMA parameters of step 2' in text
  assert 'inpainted (4, 8, 8, 1)' in text
  assert f'executable {sys.executable}' in text  # the kernel runs this interpreter
  assert 'tensorflow imported: False' in text


def test_notebook_restores_a_latent_run_and_shows_decoded_samples(latent_run):
  _, workdir = latent_run
  nb = nbformat.read(NOTEBOOK, as_version=4)
  inject_parameters(nb, WORKDIR=workdir, CONFIG='configs/no_such_file.py', NUM_STEPS=3,
                    NUM_SAMPLES=4, SEED=1)
  client = NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'samples (4, 8, 8, 1)' in text  # decoded: images, not the 4x4x4 latents
  assert 'inpainting is shown for pixel runs only' in text
