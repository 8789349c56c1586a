"""sklearn-app: a Flower / scikit-learn app."""
