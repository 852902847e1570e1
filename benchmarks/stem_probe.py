"""Do the packaged EfficientNet-Lite0 weights load as ImageNet features? A linear probe on the stem's pooled
stride-16 features of Fashion-MNIST (the stem as `model.stem` uses it: grayscale to RGB, 64 px), for the loaded
weights against a randomly initialised stem, under two input scalings ([-1, 1], the stem's own, and ImageNet's
mean/std). The numbers in docs/study.md come from

    python benchmarks/stem_probe.py            # 3,000 training and 2,000 test images, seed 0
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ermoe.data.images import load_dataset
from ermoe.models.stems import load_efficientnet_lite0

SCALINGS = {"[-1, 1]": ((0.5,) * 3, (0.5,) * 3), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


@torch.no_grad()
def pooled_features(stem: torch.nn.Module, images: torch.Tensor, mean, std, size: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 500):
        x = images[i:i + 500].float().div(255).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        out.append(stem(x)[-1].mean((2, 3)))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_dataset("fashion_mnist")
    train, test = data.train.subset(args.train), data.test.subset(args.test)
    results = {}
    for weights in ("pretrained", "random"):
        torch.manual_seed(args.seed)
        stem = load_efficientnet_lite0().eval()
        if weights == "random":
            import timm
            stem = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True,
                                     out_indices=(3,)).eval()
        for scaling, (mean, std) in SCALINGS.items():
            a, b = (pooled_features(stem, s.images, mean, std).numpy() for s in (train, test))
            scaler = StandardScaler().fit(a)
            clf = LogisticRegression(max_iter=3000).fit(scaler.transform(a), train.labels.numpy())
            results[f"{weights}, {scaling}"] = round(float(clf.score(scaler.transform(b), test.labels.numpy())), 4)
            print(f"{weights:10s} {scaling:9s} test accuracy {results[f'{weights}, {scaling}']:.4f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
