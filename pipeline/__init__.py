"""Stage one (teacher inference into a Zarr store), stage two (student training), CLI."""
