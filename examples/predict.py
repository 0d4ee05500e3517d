"""Classify digits from Python with an exported model: onnxruntime and numpy, no torch.

    python examples/predict.py [MODEL]             (default: export/model.onnx)

Runs `l2fast.infer.Predictor` on the 2,000 test digits of the bundled MNIST sample and prints the
accuracy and the three most likely classes of the first few digits.
"""
import argparse

from l2fast.data import load_dataset
from l2fast.infer import Predictor

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", nargs="?", default="export/model.onnx")
model = parser.parse_args().model

data = load_dataset("sample")                     # numpy arrays: uint8 [2000, 28, 28] test images
predictor = Predictor(model)                      # checks the sha256 in manifest.json beside the model
prediction = predictor.predict(data.test_images)  # uint8 0..255 or float 0..1, [N, 28, 28]
accuracy = (prediction.classes == data.test_labels).mean()
print(f"{model} on {predictor.provider}: {accuracy:.2%} of {len(data.test_labels):,} bundled test digits right")
classes, probabilities = prediction.top_k(3)
for i in range(3):
    guesses = ", ".join(f"{predictor.labels[c]} (p={p:.3f})" for c, p in zip(classes[i], probabilities[i]))
    print(f"test digit {i} (a {data.test_labels[i]}): {guesses}")
