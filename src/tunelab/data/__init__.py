"""Data: sources that read labelled images from local disk, and the DataModule that splits them."""
