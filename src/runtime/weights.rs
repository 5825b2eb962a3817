//! Weight matrices and vectors as the runtime holds them: in their stored dtype
//! (f32, f16 or bf16), widened to f32 only inside the kernels.
//!
//! Keeping the stored dtype halves DRAM use and memory traffic for f16/bf16
//! checkpoints; decode at batch 1 is memory-bound, so bytes read per token is
//! what sets its speed.

use half::{bf16, f16};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::input::tensors::{LinearNames, NormNames};

/// Row-major storage of one tensor in its dtype.
#[derive(Debug, Clone)]
pub enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes little-endian `bytes` of `dtype` (as safetensors stores them).
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Storage {
        let mut s = Storage::with_capacity(dtype, bytes.len() / dtype.size_bytes());
        s.extend_from_le_bytes(bytes);
        s
    }

    /// Empty storage of `dtype` with room for `elements`.
    pub fn with_capacity(dtype: DType, elements: usize) -> Storage {
        match dtype {
            DType::F32 => Storage::F32(Vec::with_capacity(elements)),
            DType::F16 => Storage::F16(Vec::with_capacity(elements)),
            DType::BF16 => Storage::BF16(Vec::with_capacity(elements)),
        }
    }

    /// Appends the little-endian elements of `bytes` (whole elements only).
    pub fn extend_from_le_bytes(&mut self, bytes: &[u8]) {
        match self {
            Storage::F32(v) => v.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Storage::F16(v) => v.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]])),
            ),
            Storage::BF16(v) => v.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]])),
            ),
        }
    }

    /// Widens elements `start..start + out.len()` into `out`.
    #[inline]
    pub fn widen_range(&self, start: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let end = start + out.len();
        match self {
            Storage::F32(v) => out.copy_from_slice(&v[start..end]),
            Storage::F16(v) => v[start..end].convert_to_f32_slice(out),
            Storage::BF16(v) => v[start..end].convert_to_f32_slice(out),
        }
    }

    /// All elements as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.widen_range(0, &mut out);
        out
    }
}

/// A `[rows, cols]` row-major matrix (PyTorch's `[out, in]` for a linear layer).
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    /// The values; empty when the matrix is block-quantized (`quant`).
    pub data: Storage,
    /// A block-quantized matrix (format section 9) kept in its blocks: the
    /// kernels compute with them (`runtime::quant`) and `data` is empty.
    pub quant: Option<crate::runtime::quant::QuantMatrix>,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Storage) -> Result<Matrix> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(Error::InvalidArgument(format!(
                "matrix of {rows}x{cols} given {} elements",
                data.len()
            )));
        }
        Ok(Matrix {
            rows,
            cols,
            data,
            quant: None,
        })
    }

    /// A matrix kept in its quantized blocks.
    pub fn quantized(m: crate::runtime::quant::QuantMatrix) -> Matrix {
        Matrix {
            rows: m.rows,
            cols: m.cols,
            data: Storage::F32(Vec::new()),
            quant: Some(m),
        }
    }

    /// The stored element type (f32 for a quantized matrix, whose rows the
    /// kernels widen to f32).
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Bytes the matrix occupies in memory (what a full matvec reads).
    pub fn size_bytes(&self) -> usize {
        match &self.quant {
            Some(q) => q.data.len(),
            None => self.data.len() * self.dtype().size_bytes(),
        }
    }

    /// Widens row `r` into `out` (`out.len() == cols`); a quantized row is
    /// dequantized (format 9.1).
    #[inline]
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match &self.quant {
            Some(q) => q.q.dequantize_row(q.row(r), out),
            None => self.data.widen_range(r * self.cols, out),
        }
    }
}

/// `y = W x + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn out_dim(&self) -> usize {
        self.weight.rows
    }

    pub fn in_dim(&self) -> usize {
        self.weight.cols
    }

    pub fn size_bytes(&self) -> usize {
        self.weight.size_bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// LayerNorm (weight and bias, or neither when not affine) or RMSNorm (weight only).
#[derive(Debug, Clone)]
pub struct NormWeights {
    pub weight: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
}

/// Where the model's tensors come from: a checkpoint, or a generator (benchmarks).
/// Names and shapes are those of [`crate::input::ModelNames`].
pub trait TensorSource {
    /// The tensor `name`, which must have `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Storage>;

    /// The `[rows, cols]` matrix `name`: [`TensorSource::tensor`]'s values,
    /// unless the source keeps a block-quantized matrix in its blocks.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        Matrix::new(rows, cols, self.tensor(name, &[rows, cols])?)
    }

    /// Layer `layer`'s FFN, when the source holds it in a form of its own
    /// (quantized bundles kept in their blocks); `None`: built from
    /// [`TensorSource::tensor`]'s matrices.
    fn own_ffn(
        &self,
        _layer: usize,
        _config: &crate::input::config::ModelConfig,
    ) -> Result<Option<Box<dyn crate::runtime::ffn::Ffn>>> {
        Ok(None)
    }
}

impl TensorSource for crate::input::Checkpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Storage> {
        let t = self.weights.get_shaped(name, shape)?;
        Ok(Storage::from_le_bytes(t.dtype, t.bytes))
    }
}

pub(crate) fn load_linear(src: &dyn TensorSource, names: &LinearNames) -> Result<Linear> {
    let weight = src.matrix(&names.weight, names.out_dim, names.in_dim)?;
    let bias = match &names.bias {
        Some(b) => Some(src.tensor(b, &[names.out_dim])?.to_f32()),
        None => None,
    };
    Ok(Linear { weight, bias })
}

pub(crate) fn load_norm(src: &dyn TensorSource, names: &NormNames) -> Result<NormWeights> {
    let get = |n: &Option<String>| -> Result<Option<Vec<f32>>> {
        match n {
            Some(name) => Ok(Some(src.tensor(name, &[names.dim])?.to_f32())),
            None => Ok(None),
        }
    };
    Ok(NormWeights {
        weight: get(&names.weight)?,
        bias: get(&names.bias)?,
    })
}
