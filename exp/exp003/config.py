"""exp003: exp001 with a gated fusion of the two image embeddings and the metadata (exp/exp003/train.py).

Hypothesis: how much each image should count differs per lesion (a blurred or distant clinical close-up, a
dermoscopic image of a site where dermoscopy shows little), and the metadata and the embeddings themselves say
which: a gate per image, computed from [clinical embedding, dermoscopic embedding, metadata] and scaling that
image's embedding before the linear classifier, lets the classifier weigh the two views per lesion instead of once
for all. The strongest honest cross-validation among published MILK10k solutions (0.544 nested, ishaannk/MILK10k-
challenge-2026, RESULTS.md) fuses the views with gates. At initialisation every gate is 1,
so exp003 starts exactly as exp001 and only learns to depart from it.

Measured (README, Results), against exp001 on the same machine: the 4,192 real lesions with signal-free images
(tiny backbone, 32 px), thresholds honest 0.3741 against 0.3754, AUC 0.8487 against 0.8509; the demo, 0.6255 against
0.6393 (hidden test 0.7885 against 0.7135). Both within the noise (fold seeds: +-0.0055; demo training seeds: +-0.02),
as expected when the images carry no signal or very little: the gates can only weigh what the images show. The
test of the idea is on real images.
"""
PARENT = "exp001"
OVERRIDES = dict()
