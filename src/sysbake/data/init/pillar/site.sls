# Data for the states; used while building, never stored in the image.
site:
  title: "Hello from @NAME@"
  message: "Baked by sysbake: systemd as PID 1, provisioned with Salt."
