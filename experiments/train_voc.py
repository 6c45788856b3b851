r"""Train DSSN on PASCAL VOC 2012 with the reference settings (configs/voc_r101.yaml:
DeepLabV3+ on the deep-stem ResNet-101, 4 GPU workers, 100 epochs) on Ray Train.

    # shards first: dssn prepare voc --root VOCdevkit/VOC2012 --split 92 --out shards/voc-92
    ray submit cluster/gpu.yaml experiments/train_voc.py -- --data s3://BUCKET/shards --split 92
    python experiments/train_voc.py --smoke-test   # a tiny digits run on this machine
"""

import sys

from dssn.tune.experiment import main

if __name__ == "__main__":
    sys.exit(main("voc_r101.yaml", tune=False, description=__doc__))
