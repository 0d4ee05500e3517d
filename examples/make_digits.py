"""Write digits to try `python -m l2fast.infer` on, taken from the bundled MNIST sample's test set.

    python examples/make_digits.py [FOLDER]        (default: digits)

FOLDER/0.png ... FOLDER/9.png: one 28x28 digit of each class, white on black as in MNIST;
FOLDER/7-on-white-112px.png: a 7 drawn dark on white at 112x112, as a scan or a drawing would be;
FOLDER/batch.npy: the first 16 test digits, uint8 [16, 28, 28].
Only these files are (re)written; anything else in FOLDER is left alone. numpy and Pillow only.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from l2fast.data import load_dataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("folder", nargs="?", default="digits")
folder = Path(parser.parse_args().folder)
folder.mkdir(parents=True, exist_ok=True)

data = load_dataset("sample")
images, labels = data.test_images, data.test_labels   # uint8 [2000, 28, 28], int64 [2000]
for digit in range(10):
    first = int(np.flatnonzero(labels == digit)[0])
    Image.fromarray(images[first]).save(folder / f"{digit}.png")
seven = images[int(np.flatnonzero(labels == 7)[0])]
Image.fromarray(255 - seven).resize((112, 112), Image.LANCZOS).save(folder / "7-on-white-112px.png")
np.save(folder / "batch.npy", images[:16])
print(f"wrote {folder}/0.png ... 9.png, 7-on-white-112px.png and batch.npy "
      f"(labels {' '.join(map(str, labels[:16]))})")
