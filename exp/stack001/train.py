"""stack001's code: the stacking recipe (src/stacker.py): the logits of ``stack_inputs``' out-of-fold and test
predictions plus the base metadata features, fitted per fold on the other folds' lesions."""
from src.stacker import StackRecipe

RECIPE = StackRecipe()
