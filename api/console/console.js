// The console: filled in next.
