"""exp003: exp001 with a gated fusion of the two image embeddings and the metadata (exp/exp003/train.py).

Hypothesis: how much each image should count differs per lesion (a blurred or distant clinical close-up, a
dermoscopic image of a site where dermoscopy shows little), and the metadata and the embeddings themselves say
which: a gate per image, computed from [clinical embedding, dermoscopic embedding, metadata] and scaling that
image's embedding before the linear classifier, lets the classifier weigh the two views per lesion instead of once
for all. The strongest honest cross-validation among published MILK10k solutions (0.544 nested, ishaannk/MILK10k-
challenge-2026, RESULTS.md) fuses the views with gates. At initialisation every gate is 1,
so exp003 starts exactly as exp001 and only learns to depart from it.

Measured (README, Results): the 4,192 real lesions with signal-free images and the demo, against exp001.
"""
PARENT = "exp001"
OVERRIDES = dict()
