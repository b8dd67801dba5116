"""Tools for developing and measuring pagedserve that are not part of the services."""
