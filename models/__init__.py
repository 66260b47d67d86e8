"""The project's references folder (like torchvision's ``references/``): datasets, backbones, the
trainer and the multi-label models, run from the checkout (``python -m models.train``). The
installed ``mlkernels`` package never imports it."""
