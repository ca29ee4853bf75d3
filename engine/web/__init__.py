"""Local web surfaces: the products server (`serve`), the interactive map page and the labelling app (`label`)."""
