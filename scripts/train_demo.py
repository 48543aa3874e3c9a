"""Train the bundled demo model: a small dense classifier for scikit-learn's 8x8 digits."""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
EPOCHS = 30
BATCH_SIZE = 32
N_SAMPLES = 8
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "modelproc" / "demo" / "digits.keras"

README_TEMPLATE = """\
# Demo model: `digits`

A small Keras 3 dense classifier for scikit-learn's 8x8 handwritten digits
(`sklearn.datasets.load_digits`), bundled so the pool can be tried without downloads.

- Test accuracy: {accuracy:.4f} (stratified 20% hold-out, seed {seed}).
- Trained with `python scripts/train_demo.py` (Adam, sparse categorical crossentropy,
  {epochs} epochs, batch {batch}, `keras.utils.set_random_seed({seed})`).
- Input `pixels`: float32 `[batch, 64]`, the flattened 8x8 image with values 0..1 (raw pixel / 16).
- Output `probs`: float32 `[batch, 10]`, softmax over digits 0-9.
- Intermediate layer `embedding`: float32 `[batch, 32]` (ReLU), usable as a feature vector.
- `samples.npz` holds `x` (the first {n} test images, float32 `({n}, 64)`) and `y` (their int64 labels).
"""


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, x_test, y_train, y_test) with pixels scaled to [0, 1] float32."""
    digits = load_digits()
    x = (digits.data.reshape(-1, 64) / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=SEED
    )
    return x_train, x_test, y_train, y_test


def build_model() -> keras.Model:
    """Build the uncompiled `digits` functional model."""
    pixels = keras.Input(shape=(64,), name="pixels")
    hidden = keras.layers.Dense(64, activation="relu", name="hidden")(pixels)
    embedding = keras.layers.Dense(32, activation="relu", name="embedding")(hidden)
    probs = keras.layers.Dense(10, activation="softmax", name="probs")(embedding)
    return keras.Model(inputs=pixels, outputs=probs, name="digits")


def parse_args() -> argparse.Namespace:
    """Parse command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="path of the .keras file")
    return parser.parse_args()


def main() -> None:
    """Train, evaluate and save the demo model with its samples and README."""
    args = parse_args()
    out: Path = args.out
    keras.utils.set_random_seed(SEED)

    x_train, x_test, y_train, y_test = load_data()
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=EPOCHS, batch_size=BATCH_SIZE, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {accuracy:.4f}")

    out.parent.mkdir(parents=True, exist_ok=True)
    # An uncompiled copy drops the optimizer state (the .keras format ignores
    # include_optimizer), keeping the bundled file small; serving never trains.
    bundled = build_model()
    bundled.set_weights(model.get_weights())
    bundled.save(out)
    np.savez(out.parent / "samples.npz", x=x_test[:N_SAMPLES], y=y_test[:N_SAMPLES])
    (out.parent / "README.md").write_text(
        README_TEMPLATE.format(
            accuracy=accuracy, seed=SEED, epochs=EPOCHS, batch=BATCH_SIZE, n=N_SAMPLES
        )
    )
    print(f"saved {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
