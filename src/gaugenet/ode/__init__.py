"""Neural ODEs, their diffeomorphism gauge symmetries, Wilson lines and linear neural ODEs."""
