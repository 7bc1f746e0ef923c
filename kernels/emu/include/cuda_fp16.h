// Stand-in for the CUDA header of the same name when the kernels are compiled for the CPU emulator.
#pragma once
#include "../cuda_emu.h"
