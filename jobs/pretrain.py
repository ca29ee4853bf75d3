"""Ray job: self-supervised GeoLink pretraining (same code as `geolink-engine pretrain`).

    ray job submit --working-dir . -- python jobs/pretrain.py --workspace /shared/geolink-data --preset base --gpu --workers 2-8 --storage s3://bucket/runs
"""

from train_args import run

if __name__ == "__main__":
    run("pretrain", __doc__.splitlines()[0])
