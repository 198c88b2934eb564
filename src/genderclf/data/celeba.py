"""The names of Kaggle's CelebA on disk (`jessicali9530/celeba-dataset`), defined once.

The CelebA reader (`layouts`) and the sample generator (`sample`), which writes the same
layout, both take them from here.
"""

from __future__ import annotations

from pathlib import Path

CELEBA_ATTR = "list_attr_celeba.csv"
CELEBA_PARTITION = "list_eval_partition.csv"
CELEBA_IDENTITY = "identity_CelebA.txt"
CELEBA_IMAGES = Path("img_align_celeba") / "img_align_celeba"
CELEBA_PARTITIONS = {"0": "train", "1": "val", "2": "test"}
CELEBA_ATTRIBUTES = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
