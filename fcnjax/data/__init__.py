"""fcnjax.data: segmentation datasets, size buckets and the Grain input pipeline.

Modules (each one job):
  * :mod:`~fcnjax.data.palette` - VOC class names, VOC palette, pixel-format conversion.
  * :mod:`~fcnjax.data.readers` - VOC 2012 / SBD / SegmentationClassAug / Oxford-IIIT Pets /
    image-folder sources (mask value modes index, binary, trimap, palette), subsets and splits.
  * :mod:`~fcnjax.data.validation` - error policy (``on_error="raise"|"skip"``) and reports.
  * :mod:`~fcnjax.data.synthetic` - built-in datasets written to disk: VOC layout
    (``ensure_builtin_dataset``), grey images + binary masks in folders (``ensure_builtin_folder``),
    an Oxford-IIIT Pets lookalike (``ensure_builtin_pets``).
  * :mod:`~fcnjax.data.buckets` - bucket-shape planner (min padded area), batch sizes.
  * :mod:`~fcnjax.data.augment` - flip / scale / colour jitter, deterministic per (seed, epoch, index).
  * :mod:`~fcnjax.data.pipeline` - per-epoch plans and the Grain train / eval loaders.
  * ``python -m fcnjax.data.stats ROOT|SIZES.csv`` - size statistics and bucket plans.
  * ``python -m fcnjax.data.check ROOT`` - scan a dataset for bad files.

Typical use (see :mod:`fcnjax.data.pipeline` for the batch format and checkpointing)::

    import fcnjax.data as fd
    root = fd.ensure_builtin_dataset()              # or a VOCdevkit / VOC2012 folder on disk
    train = fd.make_train_loader(fd.voc_source(root, "train"), batch_size=8, num_epochs=50,
                                 seed=0, max_buckets=8, augment=fd.Augment(scale_range=None))
    val = fd.make_eval_loader(fd.voc_source(root, "val"), batch_size=8, max_buckets=8)
    print(train.report()); shapes = train.bucket_shapes
    it = iter(train)
    for batch in it: ...                            # it.get_state() / it.set_state(state)
"""

from fcnjax.data.palette import IGNORE, NUM_VOC_CLASSES, VOC_CLASSES, VOC_PALETTE, colorize
from fcnjax.data.readers import (BINARY_MAP, MASK_VALUES, PETS_CLASSES, PETS_TRIMAP,
                                 SegmentationSource, folder_source, open_source, pets_source,
                                 sbd_source, scan_mask_values, split_by_fraction, voc_aug_source,
                                 voc_source)
from fcnjax.data.validation import DataError, ErrorReport
from fcnjax.data.augment import Augment
from fcnjax.data.buckets import BucketPlan, batch_sizes, plan_buckets
from fcnjax.data.pipeline import Loader, make_eval_loader, make_loader, make_train_loader
from fcnjax.data.synthetic import (FolderDataset, ensure_builtin_dataset, ensure_builtin_folder,
                                   ensure_builtin_pets, write_synthetic_folder,
                                   write_synthetic_pets, write_synthetic_voc)
