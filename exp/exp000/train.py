"""exp000's code: the tabular recipe (src/tabular.py) on the extended metadata features; which scikit-learn models
it averages is a value (``tabular_models``, exp/exp000/config.py)."""
from src.tabular import TabularRecipe, extended_features

RECIPE = TabularRecipe(features=extended_features)
